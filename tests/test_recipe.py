import pytest

from attar.errors import AttarError
from attar.recipe import builtin_recipe_path, load_recipe, parse_recipe

GOOD = """\
name: t
data: {name: digits}
stages:
  - name: teacher
    kind: train
    model: {arch: mlp}
  - name: student
    kind: distill
    teacher: teacher
    model: {arch: mlp, hidden: [8]}
    objective: {name: kd, temperature: 4}
"""


def test_good_recipe_parses():
    r = parse_recipe(GOOD)
    assert [s.name for s in r.stages] == ["teacher", "student"]
    assert r.stages[1].teachers() == ["teacher"]
    assert r.stages[0].train.epochs == 5


def test_builtin_quickstart_is_valid():
    r, _ = load_recipe(builtin_recipe_path())
    assert {s.kind for s in r.stages} >= {"train", "distill"}


@pytest.mark.parametrize(
    "old,new,line,field,words",
    [
        ("kind: train", "kind: trian", 5, "stages[0].kind", "known kinds: condense, distill, evaluate, finetune, lm, merge, train"),
        ("model: {arch: mlp}", "model: {arch: mlp, widht: 3}", 6, "stages[0].model.widht", "unknown field"),
        ("kind: train", "kind: train\n    train: {lr: fast}", 6, "stages[0].train.lr", "valid number"),
        ("teacher: teacher", "teacher: nobody", 9, "stages", "'nobody', which is no stage"),
    ],
)
def test_errors_name_line_and_field(old, new, line, field, words):
    with pytest.raises(AttarError) as e:
        parse_recipe(GOOD.replace(old, new, 1), "r.yaml")
    msg = str(e.value)
    assert f"r.yaml, line {line}" in msg or field == "stages"
    assert field in msg and words in msg


def test_missing_field_and_bad_yaml():
    with pytest.raises(AttarError, match="stages.*required field is missing"):
        parse_recipe("name: x\n")
    with pytest.raises(AttarError, match="not valid YAML"):
        parse_recipe("stages: [\n")
    with pytest.raises(AttarError, match="needs a 'teacher'"):
        parse_recipe(GOOD.replace("    teacher: teacher\n", ""))


def test_every_shipped_recipe_parses():
    from pathlib import Path

    shipped = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
    assert shipped
    for p in shipped:
        load_recipe(p)


def test_a_bare_data_name_means_name():
    text = GOOD.replace("data: {name: digits}", "data: digits")
    assert text != GOOD
    assert parse_recipe(text, "r.yaml").data.name == "digits"
    with pytest.raises(AttarError, match="exactly one source"):
        parse_recipe(GOOD.replace("data: {name: digits}", "data: {}"), "r.yaml")

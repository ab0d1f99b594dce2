"""The generic registry: one way to validate, build and describe a method of any family."""

from typing import Literal

import pytest
from pydantic import Field

from attar.errors import AttarError
from attar.registry import Params, Registry

TOYS: Registry = Registry("toy")


@TOYS.register("scaler")
class Scaler:
    class Params(Params):
        factor: float = Field(2.0, gt=0, description="multiply by this")
        name_hint: str | None = None
        mode: Literal["fast", "exact"] = "fast"
        share: float = Field(0.5, ge=0, le=1)

    def __init__(self, p):
        self.p = p


@TOYS.register("plain")
class Plain:
    def __init__(self, p):
        self.p = p


def test_build_validates_params_and_passes_them():
    s = TOYS.build({"name": "scaler", "factor": 3})
    assert isinstance(s, Scaler) and s.p.factor == 3.0
    assert TOYS.build("scaler").p.factor == 2.0


@pytest.mark.parametrize("spec, words", [
    ({"name": "scaler", "factr": 3}, ["toy 'scaler'", "unknown field 'factr'", "Accepted fields: factor (float > 0, default 2.0): multiply by this"]),
    ({"name": "scaler", "factor": -1}, ["field 'factor' = -1", "greater than 0"]),
    ({"name": "scaler", "factor": float("inf")}, ["field 'factor' = inf", "finite"]),
    ({"name": "nosuch"}, ["Unknown toy 'nosuch'", "Known toys: plain, scaler"]),
    ({"factor": 3}, ["mapping with a 'name'", "known toys: plain, scaler"]),
    ({"name": "plain", "x": 1}, ["toy 'plain' takes no parameters", "'x'"]),
    ({"name": ["unhashable"]}, ["Unknown toy"]),
])
def test_mistakes_name_the_field_and_the_accepted_fields(spec, words):
    with pytest.raises(AttarError) as e:
        TOYS.build(spec)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_fields_describe_a_method():
    assert TOYS.fields("scaler")["factor"] == {"type": "float > 0", "default": 2.0, "required": False,
                                                 "description": "multiply by this"}
    assert TOYS.fields("plain") == {}
    with pytest.raises(ValueError, match="registered twice"):
        TOYS.register("plain")(Plain)


def test_fields_show_choices_bounds_and_optional_types_as_users_write_them():
    rows = TOYS.fields("scaler")
    assert rows["mode"]["type"] == "'fast' | 'exact'"
    assert rows["share"]["type"] == "float >= 0 and <= 1"
    assert rows["name_hint"]["type"] == "str | None"
    with pytest.raises(AttarError, match=r"field 'mode' = 'slow'.*mode \('fast' \| 'exact', default 'fast'\)"):
        TOYS.build({"name": "scaler", "mode": "slow"})


def test_every_method_family_configures_through_the_generic_registry():
    """Objectives, divergences, selectors and condensers: a strict Params per method, fields for the listing,
    and build from {"name": ...} (methods with required fields excepted)."""
    from pydantic import BaseModel

    from attar import registry
    from attar.condense import CONDENSERS
    from attar.distill.divergences import DIVERGENCES
    from attar.distill.objectives import OBJECTIVES
    from attar.select import SELECTORS

    for family in (OBJECTIVES, DIVERGENCES, SELECTORS, CONDENSERS):
        for name in family:
            model = family.params_model(name)
            assert issubclass(model, registry.Params), (family.family, name)
            with pytest.raises(Exception):
                model.model_validate({"no_such_field": 1})
            rows = family.fields(name)
            if family is DIVERGENCES or any(r["required"] for r in rows.values()):
                continue
            built = family.build({"name": name})
            assert isinstance(built.p, BaseModel) and built.p == model()


def test_named_registration_tells_the_class_its_name():
    reg: Registry = Registry("toy")

    @reg.named("answer")
    class Answer:
        pass

    assert reg.get("answer") is Answer and Answer.name == "answer"

"""Classifier teacher stores: bytes per example and KD from a store against KD from the live teacher, on real data.

A teacher MLP is trained on the training split of a built-in data set (digits by default), dumped once into stores
(``attar.distill.cls_store``: every class as float32, every class at one byte per log-prob, the top-3 at one byte),
and a student is distilled (kd, T=4, alpha 0.3) from the live teacher and from each store with the same seeds.
Reported: store bytes per example, and the student's test accuracy (mean ± std over seeds) per teacher source.
No timing. Writes the ``teacher-store-cls`` section of docs/benchmarks.md unless ``--no-doc``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/teacher_store_cls.py --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _doc import replace_section  # noqa: E402

from attar.data import load_data  # noqa: E402
from attar.distill.cls_store import StoredClassifierTeacher, dump_classifier_teacher  # noqa: E402
from attar.distill.objectives import build_objective  # noqa: E402
from attar.models import build_model  # noqa: E402
from attar.specs import DataSpec, ModelSpec  # noqa: E402
from attar.train.config import TrainConfig  # noqa: E402
from attar.train.trainer import Trainer, predict  # noqa: E402

T = 4.0
STORES = {"every class, f32": dict(values="f32"), "every class, q8": dict(values="q8"),
          "top-3, q8, T=4": dict(k=3, values="q8", temperature=T)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="digits")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    b = load_data(DataSpec(name=a.data))
    x, y, tx, ty = b.train.x, b.train.y, b.test.x, b.test.y
    torch.manual_seed(0)
    teacher = build_model(ModelSpec(arch="mlp", hidden=[256]), b.input_shape, len(b.classes), b.mean, b.std)
    Trainer(teacher, build_objective({"name": "ce"}), x, y, TrainConfig(epochs=30, batch_size=64, lr=1e-3, device="cpu"),
            seed=0, progress=False).fit()
    t_acc = float((predict(teacher, tx).argmax(1) == ty).float().mean())
    tmp = Path(tempfile.mkdtemp())
    stores = {}
    for name, kw in STORES.items():
        st = dump_classifier_teacher(teacher, x, tmp / name.replace(" ", "_"), classes=b.classes, progress=False, **kw)
        stores[name] = (StoredClassifierTeacher(st), st.bytes_per_position)

    def student(seed: int, **src) -> float:
        torch.manual_seed(seed)
        s = build_model(ModelSpec(arch="mlp", hidden=[32]), b.input_shape, len(b.classes), b.mean, b.std)
        cfg = TrainConfig(epochs=a.epochs, batch_size=64, lr=3e-3, device="cpu")
        Trainer(s, build_objective({"name": "kd", "temperature": T, "alpha": 0.3}), x, y, cfg, seed=seed,
                progress=False, **src).fit()
        return 100 * float((predict(s, tx).argmax(1) == ty).float().mean())

    rows = [("live teacher", None, [student(i, teachers=[teacher]) for i in range(a.seeds)])]
    for name, (reader, bpe) in stores.items():
        rows.append((f"store: {name}", bpe, [student(i, teacher_cache=reader) for i in range(a.seeds)]))
    rows.append(("no teacher (ce)", None, [_ce(b, i, a.epochs) for i in range(a.seeds)]))
    info = dict(data=b.name, n=len(x), test=len(tx), classes=len(b.classes), teacher_acc=100 * t_acc, seeds=a.seeds,
                epochs=a.epochs, rows=rows)
    for r in rows:
        print(f"{r[0]:28s} {'' if r[1] is None else f'{r[1]:6.1f} B/ex'}  {_ms(r[2])}")
    if not a.no_doc:
        write_doc(info)


def _ce(b, seed: int, epochs: int) -> float:
    torch.manual_seed(seed)
    s = build_model(ModelSpec(arch="mlp", hidden=[32]), b.input_shape, len(b.classes), b.mean, b.std)
    Trainer(s, build_objective({"name": "ce"}), b.train.x, b.train.y,
            TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, device="cpu"), seed=seed, progress=False).fit()
    return 100 * float((predict(s, b.test.x).argmax(1) == b.test.y).float().mean())


def _ms(v: list[float]) -> str:
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"


def write_doc(info: dict) -> None:
    lines = [
        "## Classifier teacher stores: bytes per example, KD from a store vs the live teacher",
        "",
        f"`bench/teacher_store_cls.py` (`OMP_NUM_THREADS=1 .venv/bin/python bench/teacher_store_cls.py --seeds "
        f"{info['seeds']}`): {info['data']} ({info['n']} training rows, {info['classes']} classes, test "
        f"{info['test']} rows). Teacher: MLP 256 trained 30 epochs (test accuracy {info['teacher_acc']:.2f}%), "
        "dumped once per store. Student: MLP 32, kd (T = 4, alpha 0.3), "
        f"{info['epochs']} epochs, AdamW 3e-3, the same seeds for every source; test accuracy mean ± std over "
        f"{info['seeds']} seeds. Bytes: the written shards per example.",
        "",
        "| teacher source | bytes/example | student test accuracy (%) |",
        "|---|---|---|",
    ]
    for name, bpe, accs in info["rows"]:
        lines.append(f"| {name} | {'—' if bpe is None else f'{bpe:.1f}'} | {_ms(accs)} |")
    replace_section(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", "teacher-store-cls",
                    "\n".join(lines), "Benchmarks")


if __name__ == "__main__":
    main()

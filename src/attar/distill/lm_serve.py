"""Serving a causal LM's top-k log-probabilities over HTTP (``attar teacher serve``): the server side of a
served teacher; :mod:`attar.distill.lm_served` is the client the trainer distils through.

**Protocol ``attar-teacher/1``** (JSON over HTTP; :class:`TeacherServer`, ``attar teacher serve``):

* ``GET /info`` (also ``/health``): ``{protocol, model, vocab_size, tokenizer, max_topk, context, weights}``;
  ``tokenizer`` is :func:`attar.text.token_store.tokenizer_fingerprint` of the served model's tokenizer, ``weights``
  :func:`attar.distill.teacher_cache.model_hash` of its weights (a resumed run checks it).
* ``POST /v1/topk`` with ``{ids: [[int, ...], ...], topk: k, temperature: T, attention_mask: [[0|1, ...], ...]}``
  (rows may differ in length; ``attention_mask`` optional, default all ones) answers ``{protocol, model,
  vocab_size, tokenizer, topk, temperature, rows: [{ids, logprobs, log_tail}, ...]}``: for row ``r`` and every
  position ``t`` of it, the ``k`` most likely next tokens after ``ids[r][:t+1]`` (``ids[t]``, descending),
  their log-probabilities under ``softmax(logits / T)`` (``logprobs[t]``) and the log of the mass on every other
  token (``log_tail[t]``, ``null`` when ``k`` is the whole vocabulary). Bad input: status 400 and ``{error}``.
* ``POST /v1/completions`` in the OpenAI-compatible shape vLLM and SGLang serve (below), so the one client can be
  tested against either.
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from torch import nn

from attar.distill.lm_objectives import TopK
from attar.distill.lm_task import head_split
from attar.distill.teacher_cache import model_hash

__all__ = ["PROTOCOL", "DEFAULT_K", "TeacherServer", "serve_model", "served_topk"]

PROTOCOL = "attar-teacher/1"
DEFAULT_K = 32
DEFAULT_MAX_TOPK = 256
_CHUNK = 4096  # positions whose logits are made at once on the server


# ---------------------------------------------------------------------------------------------- the server


@torch.no_grad()
def served_topk(model: nn.Module, rows: list[list[int]], masks: list[list[int]] | None, k: int, temperature: float,
                vocab_size: int, pad_id: int = 0, own: list[list[int]] | None = None) -> list[tuple]:
    """``model``'s top-``k`` at every position of each (ragged) row, over its first ``vocab_size`` logits, as one
    ``(TopK, own log-prob, own rank)`` per row: rows right-padded into one batch, logits made ``_CHUNK`` positions at
    a time (a 150k vocabulary fits). ``own``: per row and position a token id whose log-prob and 1-based rank are
    returned too (else those are None)."""
    n, width = len(rows), max(len(r) for r in rows)
    dev = next(model.parameters()).device
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    real = torch.zeros((n, width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        attn[i, : len(r)] = torch.as_tensor(masks[i], dtype=torch.long) if masks is not None else 1
        real[i, : len(r)] = True
    # one masked column more, as HeadSplit.at drops the last position (causal: the others do not see it)
    ids = torch.cat([ids, torch.full((n, 1), pad_id, dtype=torch.long)], 1)
    attn = torch.cat([attn, torch.zeros((n, 1), dtype=torch.long)], 1)
    h, head = head_split(model).at(ids.to(dev), attn.to(dev), real.to(dev))
    flat_own = torch.as_tensor([t for o in own for t in o], dtype=torch.long) if own is not None else None
    tops, lps, ranks = [], [], []
    for a in range(0, len(h), _CHUNK):
        z = head(h[a : a + _CHUNK])[:, :vocab_size]
        tops.append(TopK.from_logits(z, k, temperature))
        if flat_own is not None:
            logp = torch.log_softmax(z.float() / temperature, -1)
            mine = logp.gather(-1, flat_own[a : a + _CHUNK].to(logp.device).unsqueeze(-1))
            lps.append(mine.squeeze(-1).cpu())
            ranks.append(((logp > mine).sum(-1) + 1).cpu())
    values, index, rest = (torch.cat([getattr(p, f) for p in tops]).cpu() for f in ("values", "index", "rest"))
    out, at = [], 0
    for r in rows:
        sl = slice(at, at + len(r))
        out.append((TopK(values[sl], index[sl], rest[sl], vocab_size, temperature),
                    torch.cat(lps)[sl] if lps else None, torch.cat(ranks)[sl] if ranks else None))
        at += len(r)
    return out


class TeacherServer(ThreadingHTTPServer):
    """``model`` served on ``(host, port)`` (``port`` 0: any free port; :attr:`url` says which). One forward pass at
    a time (a lock); request threads only parse and answer. ``serve_forever()`` runs it, ``shutdown()`` stops it."""

    daemon_threads = True

    def __init__(self, model: nn.Module, *, vocab_size: int, tokenizer: str = "", name: str = "", host: str = "127.0.0.1",
                 port: int = 0, max_topk: int = DEFAULT_MAX_TOPK, pad_id: int = 0, context: int | None = None,
                 decode: Any = None):
        self.model, self.vocab_size, self.tokenizer, self.name = model.eval(), int(vocab_size), tokenizer, name
        self.max_topk, self.pad_id, self.context, self.decode = int(max_topk), int(pad_id), context, decode
        self.lock = threading.Lock()
        self.answered = 0
        self.weights = model_hash(model)  # in /info: a resumed run refuses a server that now holds other weights
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def info(self) -> dict:
        return {"protocol": PROTOCOL, "model": self.name, "vocab_size": self.vocab_size, "tokenizer": self.tokenizer,
                "max_topk": self.max_topk, "context": self.context, "weights": self.weights}

    def _rows(self, rows: Any, field: str) -> list[list[int]]:
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
            raise ValueError(f"{field} must be a non-empty list of non-empty lists of token ids")
        v = int(self.model.get_input_embeddings().weight.shape[0]) if hasattr(self.model, "get_input_embeddings") \
            else self.vocab_size
        for i, r in enumerate(rows):
            if not all(isinstance(t, int) and 0 <= t < v for t in r):
                raise ValueError(f"{field}[{i}] holds something other than token ids in [0, {v})")
            if self.context and len(r) > self.context:
                raise ValueError(f"{field}[{i}] has {len(r)} tokens, the model's context is {self.context}")
        return rows

    def _k(self, k: Any, field: str) -> int:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= min(self.max_topk, self.vocab_size):
            raise ValueError(f"{field} must be an integer in [1, {min(self.max_topk, self.vocab_size)}] (this server's "
                             f"--topk and vocabulary), got {k!r}")
        return k

    def topk(self, body: dict) -> dict:
        """``POST /v1/topk`` (module doc)."""
        rows = self._rows(body.get("ids"), "ids")
        k = self._k(body.get("topk", DEFAULT_K), "topk")
        t = body.get("temperature", 1.0)
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a positive number, got {t!r}")
        masks = body.get("attention_mask")
        if masks is not None and (not isinstance(masks, list) or [len(m) for m in masks] != [len(r) for r in rows]):
            raise ValueError("attention_mask must have one 0/1 per token of ids, row by row")
        with self.lock:
            tks = [a[0] for a in served_topk(self.model, rows, masks, k, float(t), self.vocab_size, self.pad_id)]
        out = [{"ids": tk.index.tolist(), "logprobs": tk.values.tolist(),
                "log_tail": [x if math.isfinite(x) else None for x in tk.rest.tolist()]} for tk in tks]
        return self.info() | {"topk": k, "temperature": float(t), "rows": out}

    def completions(self, body: dict) -> dict:
        """``POST /v1/completions`` with ``prompt_logprobs`` (the shape vLLM answers; module doc)."""
        prompt = body.get("prompt")
        rows = self._rows([prompt] if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) else prompt,
                          "prompt")
        k = self._k(body.get("prompt_logprobs"), "prompt_logprobs")
        own = [r[1:] + [0] for r in rows]  # the prompt's next token at each position (the last: none)
        with self.lock:
            answers = served_topk(self.model, rows, None, k, 1.0, self.vocab_size, self.pad_id, own)
        choices = []
        for i, (r, (tk, lp_own, rank_own)) in enumerate(zip(rows, answers)):
            lp: list = [None]
            for t in range(len(r) - 1):
                d = {str(int(j)): {"logprob": float(v), "rank": n + 1, "decoded_token": self._text(int(j))}
                     for n, (j, v) in enumerate(zip(tk.index[t].tolist(), tk.values[t].tolist()))}
                if str(r[t + 1]) not in d:  # vLLM adds the prompt's own token, with its rank
                    d[str(r[t + 1])] = {"logprob": float(lp_own[t]), "rank": int(rank_own[t]),
                                        "decoded_token": self._text(r[t + 1])}
                lp.append(d)
            choices.append({"index": i, "text": "", "finish_reason": "length", "prompt_logprobs": lp})
        return {"object": "text_completion", "model": self.name, "choices": choices}

    def _text(self, i: int) -> str | None:
        return self.decode(i) if self.decode is not None else None


def serve_model(model: str, *, host: str = "127.0.0.1", port: int = 0, max_topk: int = DEFAULT_MAX_TOPK,
                device: str = "auto", dtype: str = "float32") -> TeacherServer:
    """A :class:`TeacherServer` for ``model``: a packaged model name (attar models list), a Hugging Face causal-LM
    folder, or an earlier run's model (``runs/<id>/<stage>``, whose ``model/`` folder an lm stage wrote)."""
    from pathlib import Path

    from attar.text.lm_io import lm_context, scored_vocab
    from attar.text.pretrained_lm import load_pretrained_lm
    from attar.text.token_store import tokenizer_fingerprint
    from attar.train.trainer import resolve_device

    folder = Path(model).expanduser()
    if folder.is_dir() and not (folder / "config.json").exists() and (folder / "model" / "config.json").exists():
        folder = folder / "model"
    lm, tok = load_pretrained_lm({"hf": str(folder)} if folder.is_dir() else {"pretrained": model})
    lm = lm.to(resolve_device(device), dtype=getattr(torch, dtype)).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    decode = (lambda i: tok.convert_ids_to_tokens(i)) if hasattr(tok, "convert_ids_to_tokens") else None
    return TeacherServer(lm, vocab_size=scored_vocab(lm, tok) or len(tok), tokenizer=tokenizer_fingerprint(tok),
                         name=model, host=host, port=port, max_topk=max_topk, pad_id=pad, context=lm_context(lm),
                         decode=decode)


class _Handler(BaseHTTPRequestHandler):
    server: TeacherServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the CLI prints one line per start
        pass

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/info", "/health"):
            self._send(200, self.server.info())
        elif self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.name, "object": "model"}]})
        else:
            self._send(404, {"error": f"no such endpoint {self.path}; GET /info, POST /v1/topk or /v1/completions"})

    def do_POST(self) -> None:
        route = {"/v1/topk": self.server.topk, "/v1/completions": self.server.completions}.get(self.path.rstrip("/"))
        if route is None:
            self._send(404, {"error": f"no such endpoint {self.path}; POST /v1/topk or /v1/completions"})
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
            answer = route(body)
        except (ValueError, TypeError) as e:
            self._send(400, {"error": str(e)})
            return
        except Exception as e:  # noqa: BLE001  (the model failed: say so, keep serving)
            self._send(500, {"error": f"{type(e).__name__}: {e}"})
            return
        self.server.answered += 1
        self._send(200, answer)

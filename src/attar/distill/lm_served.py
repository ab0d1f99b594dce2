"""A served teacher: a causal LM's top-k log-probabilities over HTTP, and the client that distils from them.

Why: a teacher too large for the student's machine (or already running in an inference server) can still teach.
The trainer reads its targets exactly as it reads a stored teacher's (:class:`~attar.distill.lm_store.StoredLMTeacher`):
:class:`ServedLMTeacher` is a top-k cache (``get(rows, width) -> TopK``, ``mode``, ``check``, ``mismatch``) whose
rows are fetched from the server when a batch needs them. So KD from ``teacher: {url: ...}`` is the same
"top-k + tail bucket" loss as from a store or a ``cache_topk`` cache, without any quantisation.

The protocol (``attar-teacher/1``) and the server are in :mod:`attar.distill.lm_serve`.

**OpenAI-compatible servers** (``protocol: openai``, or detected when ``/info`` is missing): the client posts
``{model, prompt: [ids...], max_tokens: 1, temperature: 0, prompt_logprobs: k}`` per row to ``/v1/completions`` and
reads ``choices[0].prompt_logprobs``: one entry per prompt token, the first ``null``, entry ``t + 1`` a dict
``{"token id": {logprob, rank, decoded_token}}`` with the ``k`` most likely tokens at position ``t`` (plus the
prompt's own token when it is not among them, rank > k: dropped). Such servers give log-probs of the raw logits,
so only ``T = 1`` is accepted, and the tail mass is ``1 − Σ exp(top-k)``. They declare no tokenizer: ids outside
the student's vocabulary are refused, nothing more can be checked. vLLM limits ``k`` by ``--max-logprobs`` (20).

**Failures.** A request that times out, is refused or gets a 5xx is retried ``retries`` times with doubling waits;
then :class:`~attar.train.trainer.InputUnavailable` (naming the URL) stops training with a checkpoint at the start
of the step, and ``attar run --resume`` continues once the server answers. A server that answers with fewer
positions or log-probs than asked, another vocabulary size or another tokenizer is refused by name (not retried).
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from attar.distill.lm_objectives import _LOG_FLOOR, TopK
from attar.distill.lm_serve import DEFAULT_K, PROTOCOL
from attar.errors import AttarError
from attar.train.trainer import InputUnavailable

__all__ = ["ServedLMTeacher", "parse_attar", "parse_openai", "probe", "call"]

DEFAULT_TIMEOUT = 120.0
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF = 1.0
DEFAULT_ROWS_PER_REQUEST = 16


# ---------------------------------------------------------------------------------------------- parsing answers


def _refuse(url: str, what: str) -> AttarError:
    return AttarError(f"served teacher {url}: {what}")


def parse_attar(answer: dict, lengths: list[int], k: int, vocab_size: int | None, url: str = "") -> list[tuple]:
    """``(values [n, k], ids [n, k], log tail [n])`` per row of an ``attar-teacher/1`` answer for rows of
    ``lengths`` tokens; fewer rows, positions or log-probs than asked, or another vocabulary, are refused."""
    rows = answer.get("rows")
    if answer.get("protocol") != PROTOCOL or not isinstance(rows, list):
        raise _refuse(url, f"the answer is not {PROTOCOL} (no rows); is it an OpenAI-compatible server? Set "
                      "protocol: openai")
    if vocab_size is not None and answer.get("vocab_size") != vocab_size:
        raise _refuse(url, f"it answers over a vocabulary of {answer.get('vocab_size')} tokens, the student's has "
                      f"{vocab_size}: it serves a model with another tokenizer")
    if len(rows) != len(lengths):
        raise _refuse(url, f"it answered {len(rows)} rows, {len(lengths)} were asked")
    out = []
    for i, (row, n) in enumerate(zip(rows, lengths)):
        vals, ids, tail = (np.asarray(row.get(f), dtype=object) for f in ("logprobs", "ids", "log_tail"))
        if len(vals) != n or len(ids) != n or len(tail) != n:
            raise _refuse(url, f"it returned top-k for {min(len(vals), len(ids), len(tail))} positions of row {i}, "
                          f"{n} were asked (fewer tokens than asked)")
        v = np.asarray(row["logprobs"], dtype=np.float64)
        j = np.asarray(row["ids"], dtype=np.int64)
        if v.ndim != 2 or j.shape != v.shape or v.shape[1] < k:
            got = v.shape[1] if v.ndim == 2 else 0
            raise _refuse(url, f"it returned {got} log-probs per token in row {i}, {k} were asked (fewer than asked)")
        r = np.asarray([_LOG_FLOOR if x is None else x for x in row["log_tail"]], dtype=np.float64)
        out.append(_checked(v[:, :k], j[:, :k], r, vocab_size, url))
    return out


def parse_openai(answer: dict, lengths: list[int], k: int, vocab_size: int | None, url: str = "") -> list[tuple]:
    """The same from an OpenAI-compatible ``/v1/completions`` answer with ``prompt_logprobs`` (module doc), one
    choice per prompt (matched by ``index``); position ``t`` of a row is entry ``t + 1`` of its prompt_logprobs, and
    the last position (no next prompt token) is filled with the floor (never scored: the row ends there)."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or len(choices) != len(lengths):
        n = len(choices) if isinstance(choices, list) else 0
        raise _refuse(url, f"it answered {n} completion choices, {len(lengths)} prompts were sent")
    by_index = sorted(choices, key=lambda c: c.get("index", 0))
    out = []
    for i, (c, n) in enumerate(zip(by_index, lengths)):
        lp = c.get("prompt_logprobs")
        if not isinstance(lp, list):
            raise _refuse(url, "its answer has no choices[].prompt_logprobs; the server must support vLLM's "
                          "prompt_logprobs (vLLM, SGLang)")
        if len(lp) < n:
            raise _refuse(url, f"it returned prompt_logprobs for {len(lp)} tokens of prompt {i}, {n} were sent "
                          "(fewer tokens than asked)")
        v = np.full((n, k), _LOG_FLOOR)
        j = np.zeros((n, k), dtype=np.int64)
        for t in range(n - 1):
            d = lp[t + 1] or {}
            # the k best by log-prob; a prompt token the server adds from outside the top-k (rank > k) is not one
            entries = sorted((-float(e["logprob"]), int(tid)) for tid, e in d.items()
                             if e.get("rank") is None or e["rank"] <= k)
            if len(entries) < k:
                raise _refuse(url, f"it returned {len(entries)} log-probs at token {t + 1} of prompt {i}, {k} were "
                              "asked (fewer than asked; vLLM caps them with --max-logprobs)")
            top = entries[:k]
            v[t] = [-e[0] for e in top]
            j[t] = [e[1] for e in top]
        p = np.exp(v[: n - 1]).sum(1)
        r = np.full(n, _LOG_FLOOR)
        r[: n - 1] = np.log(np.clip(1.0 - p, 0.0, None), where=p < 1.0, out=np.full(n - 1, _LOG_FLOOR))
        out.append(_checked(v, j, r, vocab_size, url))
    return out


def _checked(v: np.ndarray, j: np.ndarray, r: np.ndarray, vocab_size: int | None, url: str) -> tuple:
    if vocab_size is not None and j.size and (int(j.max()) >= vocab_size or int(j.min()) < 0):
        bad = int(j.max()) if int(j.max()) >= vocab_size else int(j.min())
        raise _refuse(url, f"it returned token id {bad}, outside the student's vocabulary of {vocab_size} tokens: it "
                      "serves a model with another vocabulary")
    return v, j, r


# ---------------------------------------------------------------------------------------------- the client


def _request(url: str, body: dict | None, timeout: float) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _message(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        try:
            return f"HTTP {e.code}: {json.loads(e.read()).get('error', '')}"
        except Exception:  # noqa: BLE001
            return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return f"{type(e).__name__}: {e}"


def call(url: str, body: dict | None, *, timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
         backoff: float = DEFAULT_BACKOFF) -> dict:
    """One request, retried on timeouts, refused connections and 5xx answers (waits ``backoff``, then doubling);
    :class:`InputUnavailable` naming the URL when every try failed, :class:`AttarError` on a 4xx (bad request)."""
    last: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            return _request(url, body, timeout)
        except urllib.error.HTTPError as e:
            if e.code < 500:
                raise AttarError(f"served teacher {url} refused the request ({_message(e)}).") from None
            last = e
        except (urllib.error.URLError, OSError, ValueError) as e:  # refused, reset, timed out, cut-off JSON
            last = e
        if attempt < retries:
            time.sleep(backoff * 2**attempt)
    raise InputUnavailable(f"the served teacher at {url} did not answer after {retries + 1} tries over "
                           f"{backoff * (2**retries - 1):g} s of waits (last: {_message(last)}); start it again (attar teacher "
                           "serve) or check the URL.")


def probe(url: str, protocol: str = "auto", timeout: float = 10.0, retries: int = 1,
          backoff: float = 0.5) -> tuple[str, dict]:
    """``(protocol, info)`` of the server at ``url``: ``attar`` with its ``/info``, or ``openai`` with the first
    model of ``/v1/models`` (``auto``: ``/info`` first)."""
    base = url.rstrip("/")
    if protocol in ("auto", "attar"):
        try:
            info = call(base + "/info", None, timeout=timeout, retries=retries, backoff=backoff)
            if info.get("protocol") == PROTOCOL:
                return "attar", info
        except AttarError as e:
            if protocol == "attar" or isinstance(e, InputUnavailable):
                raise
        if protocol == "attar":
            raise AttarError(f"served teacher {url}: /info does not answer {PROTOCOL}; an OpenAI-compatible server? "
                             "Set protocol: openai")
    models = call(base + "/v1/models", None, timeout=timeout, retries=retries, backoff=backoff)
    data = models.get("data") or []
    if not data:
        raise AttarError(f"served teacher {url}: /v1/models lists no model.")
    return "openai", {"model": data[0].get("id"), "vocab_size": None, "tokenizer": ""}


class ServedLMTeacher:
    """The top-k teacher targets of the training rows, fetched from a served teacher (module doc), where a top-k cache
    plugs in (``get(rows, width) -> TopK``). ``split``/``pad_id``: the training rows (``bind`` sets them later)."""

    #: its outputs come from outside the process: under torchrun the ranks agree each micro-batch that all got them
    external = True
    rebuild_hint = "Serve the teacher whose tokenizer the student uses (attar teacher serve --model ...)."

    def __init__(self, url: str, *, k: int = DEFAULT_K, temperature: float = 1.0,
                 protocol: Literal["auto", "attar", "openai"] = "auto", vocab_size: int | None = None,
                 split: Any = None, pad_id: int | None = None, timeout: float | None = None, retries: int | None = None,
                 backoff: float | None = None, rows_per_request: int = DEFAULT_ROWS_PER_REQUEST):
        if not url.startswith(("http://", "https://")):
            raise AttarError(f"teacher.url {url!r}: give an http:// or https:// address, e.g. http://127.0.0.1:8000")
        if not (math.isfinite(temperature) and temperature > 0):
            raise AttarError(f"served teacher: temperature must be positive, got {temperature!r}.")
        self.url, self.k, self.temperature = url.rstrip("/"), int(k), float(temperature)
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self.retries = DEFAULT_RETRIES if retries is None else retries
        self.backoff = DEFAULT_BACKOFF if backoff is None else backoff
        self.rows_per_request = rows_per_request
        self.protocol, self.info = probe(self.url, protocol, timeout=min(self.timeout, 30.0), retries=self.retries,
                                         backoff=self.backoff)
        if self.protocol == "openai" and self.temperature != 1.0:
            raise AttarError(f"served teacher {url}: an OpenAI-compatible server's prompt_logprobs are the raw "
                             f"(T = 1) log-probabilities, and the loss uses T = {self.temperature:g}; the top-k at "
                             "another temperature needs the whole distribution. Use train.temperature 1, or serve "
                             "the teacher with attar teacher serve.")
        if self.protocol == "attar" and self.k > min(self.info["max_topk"], self.info["vocab_size"]):
            raise AttarError(f"served teacher {url}: k={self.k} but the server gives at most "
                             f"{min(self.info['max_topk'], self.info['vocab_size'])} (its --topk); start it with a "
                             "larger --topk or ask for fewer.")
        self.vocab_size = vocab_size or self.info.get("vocab_size")
        self.split, self.pad_id = split, pad_id
        self.requests = 0

    def bind(self, split: Any, pad_id: int) -> "ServedLMTeacher":
        """The training rows the trainer's row indices refer to."""
        self.split, self.pad_id = split, pad_id
        return self

    def __len__(self) -> int:
        return len(self.split) if self.split is not None else 0

    @property
    def mode(self) -> str:
        told = self.info.get("tokenizer")
        return (f"served top-{self.k} of {self.vocab_size} per token + tail bucket, T={self.temperature:g} "
                f"({self.url}, {self.protocol} protocol, model {self.info.get('model') or '?'}"
                + ("" if told else "; tokenizer not declared, not checked") + ")")

    def check(self, *, tokenizer: str | None = None, vocab_size: int | None = None, ids: Any = None,
              temperature: float | None = None) -> None:
        """Refuse a server whose model has another vocabulary or tokenizer than the student's (both named)."""
        served = self.info.get("vocab_size")
        if vocab_size is not None and served is not None and served != vocab_size:
            raise _refuse(self.url, f"it serves {self.info.get('model') or 'a model'} over a vocabulary of {served} "
                          f"tokens, the student's has {vocab_size}: another tokenizer. {self.rebuild_hint}")
        if vocab_size is not None:
            self.vocab_size = vocab_size
        told = self.info.get("tokenizer")
        if tokenizer and told and tokenizer != told:
            raise _refuse(self.url, f"its tokenizer (fingerprint {told[:12]}) is not the student's ({tokenizer[:12]}; "
                          f"both {served} tokens): token ids would not mean the same tokens. {self.rebuild_hint}")
        why = self.mismatch(ids=ids, temperature=temperature)
        if why:
            raise _refuse(self.url, f"{why}.")

    def mismatch(self, teacher: nn.Module | None = None, ids: Any = None, k: int | None = None,
                 temperature: float | None = None) -> str | None:
        if ids is not None and self.split is not None and ids is not self.split and len(ids) != len(self.split):
            return f"it is bound to {len(self.split)} training rows, the training split has {len(ids)}"
        if k is not None and k != self.k:
            return f"it asks for k={self.k}, {k} requested"
        if temperature is not None and float(temperature) != self.temperature:
            return f"it asks for temperature {self.temperature:g}, the loss uses {float(temperature):g}"
        return None

    def get(self, rows: Tensor, width: int | None = None) -> TopK:
        """The teacher's top-k at every position ``< width`` of training rows ``rows`` (positions after a row's last
        response token are never scored and are filled with the floor)."""
        if self.split is None or self.pad_id is None:
            raise AttarError("served teacher: bind(split, pad_id) first (the rows the trainer's indices refer to).")
        part = self.split.rows(torch.as_tensor(rows, dtype=torch.long).reshape(-1))
        w = int(width or part.ids.shape[1])
        ids, mask = part.ids[:, :w], part.mask[:, :w].bool()
        # each row through its last response token: later positions are never scored
        ends = [int(m.nonzero().max()) + 1 if bool(m.any()) else 0 for m in mask]
        return self.topk_rows(ids, (ids != self.pad_id).long(), ends)

    def topk_rows(self, ids: Tensor, attention: Tensor, ends: list[int] | None = None) -> TopK:
        """The served top-k at every position of rows ``ids`` ``[B, W]`` (any rows in the server's tokens: the
        teacher's own rows of cross-tokenizer KD), each sent through ``ends[b]`` (default: its last attended
        position); later positions are filled with the floor."""
        n, w, k = ids.shape[0], ids.shape[1], self.k
        if ends is None:
            ends = [int(a.nonzero().max()) + 1 if bool(a.any()) else 0 for a in attention]
        values = torch.full((n, w, k), _LOG_FLOOR)
        index = torch.zeros((n, w, k), dtype=torch.long)
        rest = torch.full((n, w), _LOG_FLOOR)
        todo = [i for i in range(n) if ends[i] >= 2]
        for a in range(0, len(todo), self.rows_per_request):
            chunk = todo[a : a + self.rows_per_request]
            sent = [ids[i, : ends[i]].tolist() for i in chunk]
            for i, (v, j, r) in zip(chunk, self._fetch(sent, [attention[i, : ends[i]].long().tolist() for i in chunk])):
                e = ends[i]
                values[i, :e], index[i, :e], rest[i, :e] = (torch.from_numpy(v).float(), torch.from_numpy(j),
                                                            torch.from_numpy(r).float().clamp_min(_LOG_FLOOR))
        return TopK(values, index, rest, int(self.vocab_size), self.temperature)

    def _fetch(self, rows: list[list[int]], masks: list[list[int]]) -> list[tuple]:
        lengths = [len(r) for r in rows]
        kw = dict(timeout=self.timeout, retries=self.retries, backoff=self.backoff)
        self.requests += 1
        if self.protocol == "attar":
            answer = call(self.url + "/v1/topk", {"ids": rows, "attention_mask": masks, "topk": self.k,
                                                  "temperature": self.temperature}, **kw)
            return parse_attar(answer, lengths, self.k, self.vocab_size, self.url)
        answer = call(self.url + "/v1/completions", {"model": self.info.get("model"), "prompt": rows, "max_tokens": 1,
                                                     "temperature": 0, "prompt_logprobs": self.k}, **kw)
        return parse_openai(answer, lengths, self.k, self.vocab_size, self.url)

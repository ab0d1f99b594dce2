"""One registry per method family, and one way to configure a method.

Adding a method to any family (objectives, divergences, adapters, selectors, condensers, merge methods,
stage kinds) is the same sentence: one file, one ``@FAMILY.register("name")`` on a class with a strict
pydantic ``Params`` model, one test. The registry then validates ``{"name": ..., **params}`` specs,
lists a method's fields for ``attar methods`` and the docs, and words every mistake the same way
(the field, what was wrong, and the fields the method accepts).
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

from attar.errors import AttarError

T = TypeVar("T")


class Params(BaseModel):
    """Base of every method's ``Params``: unknown fields and NaN/Inf are refused, so typos fail at load."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _type_text(info: Any) -> str:
    """``float >= 0 and <= 1``, ``'mse' | 'cosine'``, ``int | None``: the type with its bounds, as users write it."""
    ann = info.annotation
    if get_origin(ann) is Literal:
        text = " | ".join(repr(a) for a in get_args(ann))
    elif isinstance(ann, type) and not get_args(ann):
        text = ann.__name__
    else:
        text = str(ann).replace("typing.", "")
    bounds = [f"{sym} {getattr(m, attr)}" for m in info.metadata
              for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if getattr(m, attr, None) is not None]
    return text + (" " + " and ".join(bounds) if bounds else "")


def field_rows(model: type[BaseModel] | None) -> dict[str, dict[str, Any]]:
    """``{field: {type, default, required, description}}`` of a ``Params`` model (for listings and docs)."""
    rows: dict[str, dict[str, Any]] = {}
    for name, info in (model.model_fields if model is not None else {}).items():
        rows[info.alias or name] = {  # the name users write (`lambda`, not the attribute `lambda_`)
            "type": _type_text(info),
            "default": None if info.is_required() else info.get_default(call_default_factory=True),
            "required": info.is_required(),
            "description": info.description or "",
        }
    return rows


def fields_text(model: type[BaseModel] | None) -> str:
    """``rank (int, default 8): the adapter rank; alpha (...)`` or ``(none)``."""
    parts = []
    for name, row in field_rows(model).items():
        dflt = "required" if row["required"] else f"default {row['default']!r}"
        parts.append(f"{name} ({row['type']}, {dflt})" + (f": {row['description']}" if row["description"] else ""))
    return "; ".join(parts) or "(none)"


def validation_error(where: str, e: ValidationError, model: type[BaseModel] | None = None) -> AttarError:
    """The one wording of a bad method configuration: each problem with its field, then the accepted fields."""
    problems = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(the mapping)"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown field {loc!r}")
        elif err["type"] == "missing":
            problems.append(f"missing required field {loc!r}")
        else:
            problems.append(f"field {loc!r} = {err.get('input')!r}: {err['msg']}")
    accepted = f" Accepted fields: {fields_text(model)}." if model is not None else ""
    return AttarError(f"{where}: " + "; ".join(problems) + "." + accepted)


class Registry(Generic[T]):
    """Name -> method map filled by a decorator; unknown names list the known ones.

    A registered class may declare ``Params`` (a :class:`Params` subclass); :meth:`parse` and :meth:`build`
    then validate a spec against it with :func:`validation_error`'s wording."""

    def __init__(self, family: str):
        self.family = family
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.family} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def named(self, name: str) -> Callable[[T], T]:
        """``@FAMILY.named("kd")``: register a class and set its ``name`` to the key (methods print their own name)."""

        def deco(cls: T) -> T:
            cls.name = name  # type: ignore[attr-defined]
            return self.register(name)(cls)

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self._items)) or "(none)"
            raise AttarError(f"Unknown {self.family} {name!r}. Known {self.family}s: {known}.") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    # ------------------------------------------------------------------ configuration
    def params_model(self, name: str) -> type[BaseModel] | None:
        return getattr(self.get(name), "Params", None)

    def fields(self, name: str) -> dict[str, dict[str, Any]]:
        """The fields method ``name`` accepts: ``{field: {type, default, required, description}}``."""
        return field_rows(self.params_model(name))

    def split(self, spec: Any) -> tuple[str, dict[str, Any]]:
        """``"name"`` or ``{"name": ..., **params}`` -> ``(name, params)``, refusing other shapes."""
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict) or "name" not in spec:
            article = "an" if self.family[:1] in "aeiou" else "a"
            raise AttarError(f"{article} {self.family} is given as a mapping with a 'name' (e.g. {{name: {self._example()}}}); "
                             f"known {self.family}s: {', '.join(self.names()) or '(none)'}.")
        params = dict(spec)
        return params.pop("name"), params

    def parse(self, name: str, params: dict[str, Any] | None = None) -> BaseModel:
        """Validate ``params`` against method ``name``'s ``Params``."""
        model = self.params_model(name)
        if model is None:
            if params:
                raise AttarError(f"{self.family} {name!r} takes no parameters; got {', '.join(map(repr, params))}.")
            return Params()
        try:
            return model.model_validate(params or {})
        except ValidationError as e:
            raise validation_error(f"{self.family} {name!r}", e, model) from None

    def build(self, spec: Any) -> Any:
        """``{"name": ..., **params}`` (or ``"name"``) -> ``cls(validated_params)``."""
        name, params = self.split(spec)
        return self.get(name)(self.parse(name, params))

    def _example(self) -> str:
        return self.names()[0] if self._items else "..."

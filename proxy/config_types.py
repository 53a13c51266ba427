"""The building blocks every config model shares: the frozen ``extra="forbid"`` base model,
durations and sizes parsed from strings, and the small value types (see :mod:`proxy.config`)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from proxy.units import parse_duration, parse_size

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema({"type": ["string", "number"], "pattern": r"^(\d+(\.\d+)?(us|ms|s|m|h|d))+$",
                    "description": "a duration: 250ms, 10s, 5m, 2h, 30d (a number is seconds)"}),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema({"type": ["string", "integer"],
                    "description": "a size: 512KiB, 16MiB (a number is bytes)"}),
]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Percent = Annotated[float, Field(ge=0.0, le=100.0)]
RetryCondition = Literal["connect_error", "reset", "timeout"] | Annotated[int, Field(ge=100, le=599)]
RedactKind = Literal["email", "phone", "kr_rrn", "card_number"]

HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


"""What every part of the config schema shares: the strict base model, the config error, the
RUN_ONLY marker and the constrained number types."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from raypipe.errors import UserError

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class ConfigError(UserError):
    """One or more problems in a pipeline config, each naming its key path."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"{source}: {problems[0]}")
        else:
            lines = "\n".join(f"  - {p}" for p in problems)
            super().__init__(f"{source}: {len(problems)} problems\n{lines}")


#: On a field that changes how a run is carried out, not what it computes: left out of the
#: stage fingerprints (see `run_only_exclusions`), so changing it resumes a stage.
RUN_ONLY = {"run_only": True}


class Strict(BaseModel):
    # inf and nan are never a setting: `lr: .inf` is a mistake, not a request.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

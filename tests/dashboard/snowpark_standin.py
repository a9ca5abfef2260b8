"""TEST STAND-IN for `snowflake.snowpark.context` (not Snowpark, no Snowflake connection).

`install_snowpark_standin(monkeypatch, frames)` puts three module objects into sys.modules:
`snowflake`, `snowflake.snowpark` and `snowflake.snowpark.context`, the last one with a
`get_active_session()` that returns a StandInSession. The session answers exactly the
queries `SELECT * FROM <view>` for the views in `frames` (a dict view name -> DataFrame),
raises StandInQueryRefused for anything else, and records every query it was sent.
"""

import re
import sys
import types

import pandas as pd

QUERY = re.compile(r"^\s*SELECT \* FROM ([A-Za-z_][A-Za-z0-9_]*)\s*$")


class StandInQueryRefused(Exception):
    pass


class StandInResult:
    def __init__(self, frame: pd.DataFrame):
        self._frame = frame

    def to_pandas(self) -> pd.DataFrame:
        return self._frame.copy()


class StandInSession:
    """Test stand-in for snowflake.snowpark.Session: only .sql(q).to_pandas()."""

    def __init__(self, frames: dict):
        self.frames = {name.lower(): frame for name, frame in frames.items()}
        self.queries = []

    def sql(self, query: str) -> StandInResult:
        self.queries.append(query)
        match = QUERY.match(query)
        if not match or match.group(1).lower() not in self.frames:
            raise StandInQueryRefused(f"test stand-in session does not answer {query!r}")
        return StandInResult(self.frames[match.group(1).lower()])

    def queried_views(self) -> list:
        return [QUERY.match(q).group(1).lower() for q in self.queries if QUERY.match(q)]


def install_snowpark_standin(monkeypatch, frames: dict) -> StandInSession:
    session = StandInSession(frames)
    snowflake = types.ModuleType("snowflake")
    snowflake.__path__ = []  # a package
    snowflake.__doc__ = "TEST STAND-IN package (tests/dashboard/snowpark_standin.py)"
    snowpark = types.ModuleType("snowflake.snowpark")
    snowpark.__path__ = []
    snowpark.__doc__ = "TEST STAND-IN package (tests/dashboard/snowpark_standin.py)"
    context = types.ModuleType("snowflake.snowpark.context")
    context.__doc__ = "TEST STAND-IN for snowflake.snowpark.context"
    context.get_active_session = lambda: session
    snowflake.snowpark = snowpark
    snowpark.context = context
    monkeypatch.setitem(sys.modules, "snowflake", snowflake)
    monkeypatch.setitem(sys.modules, "snowflake.snowpark", snowpark)
    monkeypatch.setitem(sys.modules, "snowflake.snowpark.context", context)
    return session

"""The user-facing errors of raydpo: config, data, cluster, storage.

Each carries what went wrong, why, and how to fix it. The CLI prints them without a traceback and exits with
`exit_code`. `assert` stays for internal invariants.
"""
from __future__ import annotations


class RaydpoError(Exception):
    kind = "error"
    exit_code = 2

    def __init__(self, what: str, why: str = "", fix: str = "", problems: list[str] | None = None):
        self.what, self.why, self.fix = what, why, fix
        self.problems = list(problems or [])
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [f"{self.kind} error: {self.what}"]
        lines += [f"  - {p}" for p in self.problems]
        if self.why:
            lines.append(f"  why: {self.why}")
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        return "\n".join(lines)

    def __reduce__(self):
        # Ray ships exceptions between processes by pickling: keep every field.
        return (_rebuild, (type(self), self.what, self.why, self.fix, self.problems))


def _rebuild(cls, what, why, fix, problems):
    return cls(what, why, fix, problems)


class ConfigError(RaydpoError):
    kind = "config"


class DataError(RaydpoError):
    kind = "data"


class ClusterError(RaydpoError):
    kind = "cluster"
    exit_code = 3


class StorageError(RaydpoError):
    kind = "storage"
    exit_code = 4

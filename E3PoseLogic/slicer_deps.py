"""First-run installation of E3Pose's heavy dependencies inside 3D Slicer (decision logic, no Slicer imports).

Order matters (a package that requires torch, installed first, would pull a CPU/CUDA build from PyPI that does
not match the machine):

1. torch through the PyTorch extension (``PyTorchUtils``: it picks the CUDA build that fits the driver, CPU
   otherwise). If the extension is missing the user is told to install it from the Extensions Manager.
2. e3nn with ``pip install --no-deps``, then each of its missing dependencies one by one, also ``--no-deps``
   (sympy, mpmath, opt_einsum, opt_einsum_fx, packaging). Packages Slicer ships or that must come from elsewhere
   (SimpleITK, torch, numpy, vtk, scipy, requests) are never installed or replaced.

Nothing happens without the user's confirmation (``confirm``), and never at import or module start-up. Offline,
the installer says so and how to install from local wheels. Everything Slicer-specific sits behind the small
:class:`Environment` interface; the Slicer module passes a real one, tests pass a fake.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Protocol

from .errors import E3PoseError

TORCH_REQUIREMENT = ">=2.2"
E3NN_REQUIREMENT = ">=0.5.5,<0.7"
# e3nn's dependency closure that Slicer does not ship (installed --no-deps, only when missing)
E3NN_DEPENDENCIES = (("sympy", ""), ("mpmath", ""), ("opt_einsum", ""), ("opt_einsum_fx", ">=0.1.4"),
                     ("packaging", ""))
NEVER_INSTALL = frozenset({"simpleitk", "torch", "numpy", "vtk", "scipy", "requests"})
DOWNLOAD_NOTE = "about 200 MB (CPU) to 3 GB (CUDA) for torch, a few MB for e3nn"


class DependencyError(E3PoseError):
    """Dependencies missing and not installable now (declined, offline, PyTorch extension absent, pip failed)."""


class Environment(Protocol):
    def installed_version(self, distribution: str) -> Optional[str]: ...

    def pytorch_utils(self):  # the PyTorchUtilsLogic() of the PyTorch extension, or None when not installed
        ...

    def pip_install(self, args: List[str]) -> None: ...

    def is_online(self) -> bool: ...

    def confirm(self, message: str, details: str) -> bool: ...


@dataclass
class Step:
    distribution: str
    requirement: str
    method: str  # "pytorchutils" | "pip"
    pip_args: List[str] = field(default_factory=list)
    installed: Optional[str] = None  # version found now (None = missing)

    def describe(self) -> str:
        have = f" (found {self.installed})" if self.installed else ""
        via = "PyTorch extension" if self.method == "pytorchutils" else "pip " + " ".join(self.pip_args)
        return f"{self.distribution}{self.requirement}{have} via {via}"


def _version_tuple(v: str):
    parts = []
    for p in re.split(r"[.+-]", v):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def satisfies(version: Optional[str], requirement: str) -> bool:
    """``version`` meets ``requirement`` (comma-separated >=, >, <=, <, ==, != clauses; '' = any)."""
    if version is None:
        return False
    v = _version_tuple(version)
    for clause in filter(None, (c.strip() for c in requirement.split(","))):
        m = re.match(r"(>=|<=|==|!=|>|<)\s*(.+)", clause)
        if not m:
            raise ValueError(f"unsupported requirement {clause!r}")
        op, ref = m.group(1), _version_tuple(m.group(2))
        n = max(len(v), len(ref))
        a, b = v + (0,) * (n - len(v)), ref + (0,) * (n - len(ref))
        ok = {">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b, ">": a > b, "<": a < b}[op]
        if not ok:
            return False
    return True


class DependencyInstaller:
    def __init__(self, env: Environment):
        self.env = env

    def plan(self) -> List[Step]:
        """The steps still needed, in order (empty = all present)."""
        steps = []
        tv = self.env.installed_version("torch")
        if not satisfies(tv, TORCH_REQUIREMENT):
            steps.append(Step("torch", TORCH_REQUIREMENT, "pytorchutils", installed=tv))
        ev = self.env.installed_version("e3nn")
        if not satisfies(ev, E3NN_REQUIREMENT):
            steps.append(Step("e3nn", E3NN_REQUIREMENT, "pip", ["--no-deps", f"e3nn{E3NN_REQUIREMENT}"],
                              installed=ev))
        for dist, req in E3NN_DEPENDENCIES:
            v = self.env.installed_version(dist)
            if not satisfies(v, req) and dist.lower() not in NEVER_INSTALL:
                steps.append(Step(dist, req, "pip", ["--no-deps", f"{dist}{req}"], installed=v))
        for s in steps:
            assert s.method == "pytorchutils" or s.distribution.lower() not in NEVER_INSTALL
        return steps

    def missing_message(self, steps: List[Step]) -> str:
        return ("E3Pose needs these Python packages, which are not installed yet "
                f"({DOWNLOAD_NOTE}). Install them now?")

    def ensure(self) -> List[Step]:
        """Install what is missing, after the user confirmed (``Environment.confirm``); returns the steps done.

        There is no way to skip the question: tests and scripts answer it by passing an Environment whose
        ``confirm`` says yes. Raises DependencyError with a message the user can act on.
        """
        steps = self.plan()
        if not steps:
            return []
        details = "\n".join(s.describe() for s in steps)
        if not self.env.is_online():
            raise DependencyError(
                "E3Pose needs packages that are not installed, and this computer cannot reach the Python package "
                f"index (offline or behind a proxy).\nMissing: {details}\n"
                "Connect and retry, or install from wheel files you copied here: in Slicer's Python console run "
                "slicer.util.pip_install('--no-index --find-links=/path/to/wheels --no-deps e3nn') (and the same "
                "for each package listed), with torch installed through the PyTorch extension first.")
        if not self.env.confirm(self.missing_message(steps), details):
            raise DependencyError("Installation declined: E3Pose cannot run without " +
                                  ", ".join(s.distribution for s in steps) + ".")
        done = []
        for s in steps:
            if s.method == "pytorchutils":
                ptu = self.env.pytorch_utils()
                if ptu is None:
                    raise DependencyError(
                        "torch must be installed through Slicer's PyTorch extension: open View > Extensions "
                        "Manager, install 'PyTorch', restart Slicer, then run E3Pose again.")
                try:
                    ptu.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
                except Exception as exc:  # noqa: BLE001
                    raise DependencyError(f"Installing torch with the PyTorch extension failed: {exc}") from exc
            else:
                try:
                    self.env.pip_install(list(s.pip_args))
                except Exception as exc:  # noqa: BLE001
                    raise DependencyError(f"pip install {' '.join(s.pip_args)} failed: {exc}") from exc
            done.append(s)
        return done


# --------------------------------------------------------------------------------------------------- helpers
def installed_version(distribution: str) -> Optional[str]:
    """Version from package metadata (without importing the package: a broken torch must not block us)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def can_reach(host: str = "pypi.org", port: int = 443, timeout: float = 3.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False

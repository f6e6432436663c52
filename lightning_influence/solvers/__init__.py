"""Inverse solvers for one parameter block, found by name with :func:`make_solver`."""
from . import datainf, exact, hyperinf, identity, kronecker, lissa  # noqa: F401  (registers the solvers)
from .base import SOLVERS, InverseSolver, check_solver, flat, make_solver, register_solver, solver_name
from .damping import datainf_damping
from .datainf import DataInfSolver
from .exact import ExactSolver
from .hyperinf import HyperINFSolver
from .identity import IdentitySolver
from .kronecker import KroneckerSolver
from .lissa import LiSSASolver

__all__ = ["InverseSolver", "SOLVERS", "register_solver", "make_solver", "check_solver", "solver_name", "flat",
           "datainf_damping", "IdentitySolver", "ExactSolver", "DataInfSolver",
           "HyperINFSolver", "LiSSASolver", "KroneckerSolver"]

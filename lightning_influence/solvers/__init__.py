"""Inverse solvers for one parameter block, found by name with :func:`make_solver`."""
from .base import InverseSolver, SOLVERS, check_solver, flat, make_solver, register_solver, solver_name
from .damping import datainf_damping
from . import identity, exact, datainf, hyperinf, lissa, kronecker  # noqa: F401  (registers the solvers)
from .identity import IdentitySolver
from .exact import ExactSolver
from .datainf import DataInfSolver
from .hyperinf import HyperINFSolver
from .lissa import LiSSASolver
from .kronecker import KroneckerSolver

__all__ = ["InverseSolver", "SOLVERS", "register_solver", "make_solver", "check_solver", "solver_name", "flat",
           "datainf_damping", "IdentitySolver", "ExactSolver", "DataInfSolver",
           "HyperINFSolver", "LiSSASolver", "KroneckerSolver"]

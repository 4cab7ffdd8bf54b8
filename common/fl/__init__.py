"""The federated engine: one training loop; algorithms are configurations of it (see `algorithms.py`)."""
from common.fl.algorithms import Algorithm, get_algorithm, register_algorithm
from common.fl.engine import FederatedRun, RunContext, evaluate
from common.fl.personal import LocalEntries, SingleSet
# Algorithms of the shared engine beyond those in algorithms.py; importing them registers them.
from common.fl import scaffold, server_optim  # noqa: E402,F401

__all__ = ["Algorithm", "get_algorithm", "register_algorithm", "FederatedRun", "RunContext", "evaluate",
           "LocalEntries", "SingleSet"]

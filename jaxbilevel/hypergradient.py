# Hypergradients as pure functions. The module documentation, including the
# closure contract, is that of jaxbilevel._src.hypergradient (set below).

from jaxbilevel._src import hypergradient as _impl
from jaxbilevel._src.hypergradient import conjugate_gradient
from jaxbilevel._src.hypergradient import cross_vjp
from jaxbilevel._src.hypergradient import direct_solve
from jaxbilevel._src.hypergradient import hvp
from jaxbilevel._src.hypergradient import implicit_hypergradient
from jaxbilevel._src.hypergradient import implicit_solution
from jaxbilevel._src.hypergradient import ImplicitInfo
from jaxbilevel._src.hypergradient import LinearSolveResult
from jaxbilevel._src.hypergradient import neumann
from jaxbilevel._src.hypergradient import unrollable_adam
from jaxbilevel._src.hypergradient import unrolled_solve

__doc__ = _impl.__doc__  # pylint: disable=redefined-builtin

__all__ = ("ImplicitInfo", "LinearSolveResult", "conjugate_gradient",
           "cross_vjp", "direct_solve", "hvp", "implicit_hypergradient", "implicit_solution",
           "neumann", "unrollable_adam", "unrolled_solve")

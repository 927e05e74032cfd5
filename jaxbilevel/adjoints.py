# How jaxbilevel.hypergradient_descent differentiates the lower solve. The
# module documentation is that of jaxbilevel._src.adjoints (set below).

from jaxbilevel._src import adjoints as _impl
from jaxbilevel._src.adjoints import default_tol
from jaxbilevel._src.adjoints import FirstOrder
from jaxbilevel._src.adjoints import Implicit
from jaxbilevel._src.adjoints import Unrolled

__doc__ = _impl.__doc__  # pylint: disable=redefined-builtin

__all__ = ("FirstOrder", "Implicit", "Unrolled", "default_tol")

"""The application benchmark behind ``benchmarks/run.py``, by concern.

* ``methods``: every application's method table as data (name, constructor,
  keyword arguments); the settings text is generated from those arguments.
* ``config``: the applications, their full and quick budgets, descriptions.
* ``harness``: running a method under a budget, interleaved timing against
  the floor, compile time and compiled memory, time to target.
* ``peers``: the same problem in other libraries (jaxopt, TorchOpt).
* ``studies``: sweep throughput and the sinusoid side studies.
* ``report``: JSON, Markdown and PNG output.
"""

"""The executors: the places where ``Engine.embed`` runs, each behind the one contract in
:mod:`embedpool.executor` (``submit``, ``stats``, ``broken``, ``close``).

=====================  ==========================================  ============================
executor               where the engine runs                       module
=====================  ==========================================  ============================
``InProcessExecutor``  this process, one background thread         ``executors/inprocess.py``
``Pool``               local worker processes (CPU or one GPU)     ``executors/pool/``
``DeviceExecutor``     one pool per GPU plus the CPU, a batch to   ``executors/devices.py``
                       whichever member has room, GPUs first
``RayExecutor``        Ray actors on a cluster                     ``executors/ray/``
=====================  ==========================================  ============================

``placement.start_executor`` is the one place that builds any of them (for the CLI, the
library and ``serve``). Every executor draws its work from a ``workqueue.WorkQueue`` and takes
every failure through ``faults.py``, so a poison input, a death or a hang means the same thing
everywhere. Importing this package imports no executor (``ray`` in particular is imported only
when a ``RayExecutor`` is built, and a missing extra fails there with an error naming it).
"""

"""The code sandbox: a model's program runs where the kernel confines it, its checks run where it cannot reach.

``runner.py`` is the interface (``run_program``, ``run_programs``, ``isolation_problem``);
``verdict.py`` is the process that runs a sample's checks; ``isolation.py`` launches the
confined program process from the system calls of ``kernel.py``; ``program_server.py`` runs
inside it and answers the checks' calls. Standard library only, every file: the verdict
process loads its siblings by path, and ``runner.py`` may be loaded alone by path.
"""

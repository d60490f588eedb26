"""The facts glmfleet reads from hosts, one module per domain, and the engine that asks them:
``engine`` asks each fact once per host and run and every role's questions in one command;
``output`` holds what the facts' parsers share; ``gpu``, ``packages``, ``paths``, ``network``,
``vllm``, ``weights`` and ``containers`` are the facts themselves."""

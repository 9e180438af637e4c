"""Every hook autocomp calls, in one place.

Plugins are modules (or objects) registered under the entry-point group ``autocomp``. Each hook
below is a *registration* hook: autocomp calls it once, when plugins are first needed, with a
``register`` callback. The plugin calls ``register`` once per thing it provides. Because the engine
owns the callback it knows which plugin registered what, and it rejects a name registered twice,
naming both packages.

All hooks are called for every plugin (no first-answer-wins); return values are ignored.

Example plugin module::

    from autocomp import hookimpl

    @hookimpl
    def register_targets(register):
        register(MyBoardTarget())
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("autocomp")
hookimpl = pluggy.HookimplMarker("autocomp")


# --- registration: called once, when the plugin manager first loads --------------------------


@hookspec
def register_methods(register):
    """Register compression methods.

    Called once per process, the first time methods, targets or workloads are needed.

    :param register: ``register(method)`` where ``method`` is an :class:`autocomp.method.Method`
        instance. ``method.name`` is the key of its table in a search-space file and must be
        unique across all installed plugins.
    """


@hookspec
def register_targets(register):
    """Register hardware targets (devices whose latency is measured or predicted).

    Called once per process, the first time plugins are needed.

    :param register: ``register(target)`` where ``target`` is an :class:`autocomp.target.Target`
        instance. ``target.name`` and every entry of ``target.aliases`` must be unique across all
        installed plugins; ``--target`` accepts any of them.
    """


@hookspec
def register_workloads(register):
    """Register named workloads (a trained model with its data and metric).

    Called once per process, the first time plugins are needed.

    :param register: ``register(name, factory, description="")`` where ``factory()`` takes no
        arguments and returns an :class:`autocomp.workload.Workload`. ``--workload NAME`` picks it;
        ``--workload module:function`` calls a user's factory without any registration.
    """

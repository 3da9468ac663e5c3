"""The shared mapping core: agents, presences and sync rules, with no HTTP or SDK inside.

Adapters (``dataverse``, ``graph_sync``, ``bot``) hand it plain events and implement its ports;
``service`` wires it to a store and to the adapters.
"""

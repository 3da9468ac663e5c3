"""Dataverse / Dynamics 365 Contact Center adapter: the webhook intake (``webhook``), its context parser
(``context``), the Web API client that is the core's Dynamics 365 port (``client``), agent discovery
(``discovery``) and webhook registration (``registration``). See ``docs/adapters.md``."""

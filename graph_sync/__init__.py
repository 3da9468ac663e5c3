"""The Microsoft Graph adapter: Teams presence writes and reads (``teams``), subscriber accounts
(``accounts``, ``login``), presence subscriptions (``subscriptions``) and the notification routes
(``notifications``, decrypting with ``crypto``). It speaks to the core only through ``mapping``."""

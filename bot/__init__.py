"""The Teams bot adapter: agents change their own presence by chatting with the bot.

- ``bot.commands``: what a message means and what to answer (plain code, no Bot Framework types).
- ``bot.followups``: proactive follow-ups when a change the bot reported as queued lands or dies.
- ``bot.teams``: the only module that imports botbuilder (``BotIntake``, ``POST /api/messages``).
- ``bot.package``: the Teams app package (manifest + icons, zipped flat).

Keeping the SDK in one thin module is deliberate: botbuilder is archived upstream (its successor is
the Microsoft 365 Agents SDK), and replacing it must mean rewriting ``bot/teams.py`` only.
"""

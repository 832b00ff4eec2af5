"""Reward-model plug-ins (installed as ``flowalign.rewards``)."""

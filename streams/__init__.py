"""Kafka/Faust side: topics, agents, the worker and the command line. Calls ``models`` and ``state``."""

"""Engines run the planned extraction: `local` decodes in a thread pool and runs the model
in this process; it is also the unit a distributed worker runs on its shard."""

"""The worker: a supervisor process and child processes that consume on their own."""

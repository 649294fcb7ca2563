"""HTTP routers, one per resource: generation, tasks, admin prompts, operations."""

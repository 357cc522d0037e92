"""The head-node side of a run: ``fit`` (plan, typed worker plan, Ray Train, post-run evaluation where the resources
are), its Ray session, the embedded default, run identity (resume or refuse a name), which ids train and validate."""

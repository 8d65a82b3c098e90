"""Ray: the session, the extract pipeline and its actors, the Ray Train worker loop."""

"""Glue between leanops and other libraries' models (imported on demand: ``leanops.integrations.transformers``,
``leanops.integrations.open_clip``)."""

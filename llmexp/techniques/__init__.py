"""The technique contract and the plugin host: hook specifications, the ``Technique`` class, loading plugins."""

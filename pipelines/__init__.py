"""diffusers pipelines and model wrappers (installed as ``flowalign.pipelines``)."""

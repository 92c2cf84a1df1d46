"""Importable measuring code behind ``patchc bench ...`` (the scripts in ``bench/`` call it)."""

"""Implementation of jaxbilevel; the public names are re-exported by the package modules."""

"""The versioned artifact store (see DESIGN.md "Artifacts")."""

from .manifest import Manifest
from .store import Artifact, ArtifactError, ArtifactStore, MissingArtifact, Problem

__all__ = ["Artifact", "ArtifactError", "ArtifactStore", "Manifest", "MissingArtifact", "Problem"]

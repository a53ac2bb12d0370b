"""PDF inside other projects' trainers. Each integration imports only ``pdfkernels`` and ``pdfkernels.models``
and takes the peer's classes as arguments: the peer (VLM2Vec) is never a dependency nor imported here."""

"""imgembed: embed image corpora with MobileNet V1 on Apache Beam, index them with FAISS."""

__version__ = "0.2.0"

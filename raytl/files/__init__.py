"""Files and object storage: paths and URIs, retries, Parquet parts, embeddings, OUTPUT folders."""

"""The configuration API: load Kubernetes-style documents, validate them with Istio's semantics,
and write a batch to the store in one transaction.

Layout: `documents` reads YAML (files, directories, stdin) keeping each document's source;
`kinds` is the registry of supported kinds (apiVersions, aliases, store keys); `validate/` holds
one pure validator per kind built on the declarative field walker in `schema`; `batch` turns raw
documents into normalized ones and checks cross-document references; `apply` is the only part
that does I/O (one store transaction per batch, VIP allocation for Services).
"""

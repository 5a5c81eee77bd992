"""The mesh's certificate authority: X.509/SPIFFE primitives (`certs`), the CA directory
(`files`), the signer that answers agents' requests through the store (`signer`), and the
`nodeagent ca …` command line (`cli`). See docs/identity.md."""

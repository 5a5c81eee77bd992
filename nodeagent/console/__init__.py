"""The mesh console: a read-only web UI served by its own control-plane process
(`nodeagent console`).

It reads the store (config, workloads, certificates, rollouts, the agents' node records) and
scrapes every agent's Istio metrics on 15020; nothing else. Pure modules compute what the pages
show: `traffic` (rates, error ratios and p99 from successive scrapes), `graph` (the service
graph and Kiali's health colours), `checks` (config health), `details` (a node's versions,
routes from `meshctl explain`, policies, certificates), `rollouts` (the progressive-delivery
status records), `selection` (the pods a service or subset selects) and `api` (the JSON
endpoints). `server` is the process: store polling, the
scraper, the HTTP server and its bearer-token check (`auth`). `static/` holds the page (plain ES
modules and an SVG graph, no CDN) — docs/console.md.
"""

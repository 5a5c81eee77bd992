"""The shared proxy: every pod's captured connections land here (issue 3: plain TCP forwarding)."""

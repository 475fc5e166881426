"""Plug points of other engines.

- `kvpack.integrations.lmcache`: a serde named "kvpack" for LMCache's distributed storage
  (`lmcache.v1.distributed.serde`), so chunks LMCache stores or moves (disk, remote L2, other
  instances) are kept in a kvpack method's packed format.

Nothing in kvpack imports these modules; they import optional packages on demand.
"""

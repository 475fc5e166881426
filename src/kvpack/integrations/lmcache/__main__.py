"""`python -m kvpack.integrations.lmcache [LMCache server args]`: LMCache's cache server with the "kvpack" serde registered."""
import runpy
import sys

from kvpack.integrations.lmcache import register

if __name__ == "__main__":
    register()
    sys.argv[0] = "lmcache.v1.multiprocess.server"
    runpy.run_module("lmcache.v1.multiprocess.server", run_name="__main__", alter_sys=True)

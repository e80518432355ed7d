"""Scale-out on Ray Serve: `readmoe serve --replicas N`.

affinity.py holds the routing policy (pure Python), routers.py its Ray Serve
`RequestRouter`s, replica.py the engine replica, ingress.py the OpenAI front end
that pre-gates each prompt, deploy.py the application, simulate.py the N-replica
simulation. Nothing here is imported by `readmoe serve` with one replica.
"""

"""gRPC and HTTP API of the control daemon.

``hpcserve.api.v1`` holds the code generated from ``proto/hpcserve/api/v1/*.proto``
(public ``Serving`` service, internal ``WorkerLink``); servicers, the auth interceptor
and the OpenAI HTTP gateway live next to it in this package.
"""

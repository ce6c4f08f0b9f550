"""loratune: the gRPC contract, generated from protos/loratune/*/v1/*.proto."""

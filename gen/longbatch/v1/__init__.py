"""Generated from protos/longbatch/v1 by tools/genproto.py."""

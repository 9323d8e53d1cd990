"""The GPULimitPolicy API: the custom resource's identity, its models, the CRD built from them,
and the limit-name grammar the flows share."""

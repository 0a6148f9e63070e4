-- Argo CD health check for imagegen.dev/ImageGenService (docs/gitops.md shows where it goes).
--
-- Reads only what the operator promises in status: observedGeneration, and the Ready and
-- Progressing conditions, each with its own observedGeneration.
--   Healthy      Ready=True for the current generation.
--   Progressing  the operator has not seen this generation yet, or Ready=False while a
--                rollout or a node pool is on its way (Progressing=True).
--   Degraded     Ready=False with nothing on its way: the spec cannot run as written
--                (nothing was created, so there is no Progressing condition), or a node
--                pool error that needs a person (quota, permissions, a rejected pool).

-- Reasons of Ready=False that no amount of waiting fixes: those the operator reports with
-- Stalled=True. Not those it tries again by itself after a while (CreateFailed: a GPU
-- stockout; RateLimited, GkeUnavailable, DeleteFailed, PoolError), which stay Progressing
-- while the rollout waits, as kstatus and Flux read them.
local needs_a_person = {
  InvalidSpec = true,
  CredentialsUnavailable = true,
  ClusterNotFound = true,
  InvalidCluster = true,
  QuotaExceeded = true,
  PermissionDenied = true,
  RequestRejected = true,
  InvalidNodePool = true,
  GkeError = true,
  ConfigConnectorMissing = true,
  ClusterUnknown = true,
  ForeignCluster = true,
  LocationsOutsideCluster = true,
  ApplyRejected = true,
  PoolTooSmall = true,
  PoolNotOwned = true,
  PoolConfigMismatch = true,
  PoolClaimed = true,
  ProgressDeadlineExceeded = true,
}

local function condition(status, type_)
  for _, c in ipairs(status.conditions or {}) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local hs = { status = "Progressing", message = "Waiting for the operator to report a status" }
local status = obj.status
if status == nil then
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local ready = condition(status, "Ready")
if ready == nil then
  return hs
end
if generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation then
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

hs.message = ready.message or ready.reason or ""
if ready.status == "True" then
  hs.status = "Healthy"
  return hs
end

local progressing = condition(status, "Progressing")
if needs_a_person[ready.reason] or progressing == nil or progressing.status ~= "True" then
  hs.status = "Degraded"
  hs.message = (ready.reason or "NotReady") .. ": " .. hs.message
  return hs
end

hs.status = "Progressing"
return hs

-- wrk script: durable appends of 1,000 events each, each request to a new stream (the shape of
-- ../shared/peers/append.lua). wrk -t2 -c4 -d10s -s bench/wrk/batch.lua http://127.0.0.1:PORT
local counter = 0
local thread_id = 0
function setup(thread) thread:set("tid", thread_id); thread_id = thread_id + 1 end
function init(args)
  math.randomseed(os.time() + tid)
  local events = {}
  for i = 1, 1000 do events[i] = '{"type":"Tick","data":{"i":1,"customer_id":"c1"}}' end
  body = "[" .. table.concat(events, ",") .. "]"
end
request = function()
  counter = counter + 1
  local path = "/streams/load-" .. tid .. "-" .. counter .. "-" .. math.random(1, 1000000000)
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, body)
end
response = function(status, headers, body)
  if status ~= 200 then io.stderr:write("status " .. status .. "\n") end
end

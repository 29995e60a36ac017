module meshward.local/pause

go 1.24

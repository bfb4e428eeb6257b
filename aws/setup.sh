#!/usr/bin/env bash
# One-time AWS set-up for cluster.yaml, instead of what `ray up` would create by default (a
# security group open to SSH from anywhere, and a head role with full EC2 and S3 access):
#   - security group `raypipe-nodes`: all traffic between the cluster's nodes, SSH only from
#     ADMIN_CIDR (your address, e.g. 203.0.113.7/32); nothing else from outside;
#   - instance profile `raypipe-head`: aws/head-policy.json (launch and stop only this
#     cluster's tagged nodes, pass the worker role, the storage bucket);
#   - instance profile `raypipe-worker`: the storage bucket only.
# Then put the printed group id into cluster.yaml (every node type's SecurityGroupIds).
#
#   ADMIN_CIDR=203.0.113.7/32 VPC_ID=vpc-… BUCKET=your-bucket bash aws/setup.sh
set -euo pipefail
: "${ADMIN_CIDR:?your address as a /32, e.g. 203.0.113.7/32}" "${VPC_ID:?}" "${BUCKET:?}"
case "$ADMIN_CIDR" in 0.0.0.0/*) echo "ADMIN_CIDR must not be the whole internet" >&2; exit 2;; esac
here="$(cd "$(dirname "$0")" && pwd)"

sg=$(aws ec2 create-security-group --group-name raypipe-nodes --vpc-id "$VPC_ID" \
  --description "raypipe cluster nodes" --query GroupId --output text)
aws ec2 authorize-security-group-ingress --group-id "$sg" \
  --ip-permissions "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$sg}]"
aws ec2 authorize-security-group-ingress --group-id "$sg" \
  --protocol tcp --port 22 --cidr "$ADMIN_CIDR"

trust='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
bucket_only="{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":[\"s3:ListBucket\",\"s3:GetObject\",\"s3:PutObject\",\"s3:DeleteObject\"],\"Resource\":[\"arn:aws:s3:::$BUCKET\",\"arn:aws:s3:::$BUCKET/*\"]}]}"
for role in raypipe-head raypipe-worker; do
  aws iam create-role --role-name "$role" --assume-role-policy-document "$trust" >/dev/null
  aws iam create-instance-profile --instance-profile-name "$role" >/dev/null
  aws iam add-role-to-instance-profile --instance-profile-name "$role" --role-name "$role"
done
aws iam put-role-policy --role-name raypipe-head --policy-name raypipe-head \
  --policy-document "$(sed "s/your-bucket/$BUCKET/g" "$here/head-policy.json")"
aws iam put-role-policy --role-name raypipe-worker --policy-name raypipe-bucket \
  --policy-document "$bucket_only"
echo "security group: $sg  (cluster.yaml: SecurityGroupIds: [$sg] on every node type)"
